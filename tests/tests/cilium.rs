//! The Cilium agent as a source (issue 18): `check` and `agent` against a Cilium API served on
//! a unix socket by the test (the real 1.16.15 agent's JSON, tests/data/cilium-api/) and a
//! restart reproduced with real kernel objects: the maps re-created and re-pinned while the
//! attached program still holds the old one, then switched.

use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvcheck::model::version::Layout;
use kvcheck_tests::agent::{Agent, http_get, pair};
use kvcheck_tests::ciliumapi::{CiliumApi, Mode, agent_docs};
use kvcheck_tests::progs::{self, BPF_TCX_INGRESS};
use kvcheck_tests::require_root;
use kvcheck_tests::simcluster::{NodeSpec, REMOTE_PODS, consistent_node};
use kvcheck_tests::simnode::SimulatedNode;
use serde_json::Value;

fn check_args(node: &SimulatedNode, api: Option<&CiliumApi>, extra: &[&str]) -> Vec<String> {
    let mut args = node.check_args();
    args.extend(
        [
            "--settle",
            "0",
            "--output",
            "json",
            "--cilium-version",
            "1.16",
        ]
        .map(String::from),
    );
    if let Some(api) = api {
        args.extend(["--cilium-socket".to_owned(), api.socket_str().to_owned()]);
    }
    args.extend(extra.iter().map(ToString::to_string));
    args
}

fn run(args: &[String]) -> (Option<i32>, Value, String) {
    let out = Command::new(kvcheck_tests::kvcheck_bin())
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let doc: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("no JSON ({}): {stderr}", out.status));
    (out.status.code(), doc, stderr)
}

fn check(
    node: &SimulatedNode,
    api: Option<&CiliumApi>,
    extra: &[&str],
) -> (Option<i32>, Value, String) {
    run(&check_args(node, api, extra))
}

fn kinds(doc: &Value) -> Vec<(String, String)> {
    doc["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| pair(f["kind"].as_str().unwrap(), f["subject"].as_str().unwrap()))
        .collect()
}

fn remote_pod() -> String {
    format!("{}/32", REMOTE_PODS[0].0)
}

#[test]
fn a_ready_agent_is_judged_and_drift_is_found() {
    if !require_root("a_ready_agent_is_judged_and_drift_is_found") {
        return;
    }
    let node = consistent_node(NodeSpec::new(Layout::V1_15, false)).unwrap();
    let api = CiliumApi::start(agent_docs("ready", true));
    let (code, doc, _) = check(&node, Some(&api), &[]);
    assert_eq!((code, kinds(&doc)), (Some(0), vec![]), "{doc:#}");
    let c = &doc["sources"]["cilium"];
    // (The captured agent's version string is empty: " (v-)".)
    assert_eq!(
        (c["source"].as_str(), c["state"].as_str()),
        (Some("api"), Some("ready")),
        "{c:#}"
    );
    assert_eq!(c["config"]["kvstore"], "etcd", "{c:#}");
    assert!(c["endpoints"]["total"].as_u64().unwrap() >= 2, "{c:#}");
    node.ipcache_delete(&remote_pod()).unwrap();
    let (code, doc, _) = check(&node, Some(&api), &[]);
    assert_eq!(
        (code, kinds(&doc)),
        (Some(1), vec![pair("ipcache-missing", &remote_pod())]),
        "{doc:#}"
    );
}

/// Down, starting, unhealthy: never drift, exit 2 naming the agent's state, etcd health still
/// reported; a drift present meanwhile is not judged. Without any socket: judged as before.
#[test]
fn an_agent_that_is_not_ready_is_not_judged() {
    if !require_root("an_agent_that_is_not_ready_is_not_judged") {
        return;
    }
    let node = consistent_node(NodeSpec::new(Layout::V1_15, false)).unwrap();
    node.ipcache_delete(&remote_pod()).unwrap();
    let mut api = CiliumApi::start(Mode::Silent);
    let not_ready = |api: &CiliumApi, state: &str| {
        let t0 = Instant::now();
        let (code, doc, stderr) = check(&node, Some(api), &["--cilium-ready-timeout", "2s"]);
        assert!(
            t0.elapsed() >= Duration::from_secs(2),
            "waited for readiness"
        );
        assert_eq!(
            (code, doc["status"].as_str(), kinds(&doc)),
            (Some(2), Some("cilium-not-ready"), vec![]),
            "{doc:#}"
        );
        assert_eq!(doc["sources"]["cilium"]["state"], state, "{doc:#}");
        assert!(
            doc["sources"]["kvstore"]["status"]
                .as_str()
                .unwrap()
                .contains("1/1 connected"),
            "etcd health is reported: {doc:#}"
        );
        assert!(
            stderr.contains(&format!("Cilium agent not ready: {state}")),
            "{stderr}"
        );
    };
    not_ready(&api, "starting");
    api.set(agent_docs("ready", false));
    not_ready(&api, "not-ready");
    api.crash();
    not_ready(&api, "not-running");
    api.stop();
    not_ready(&api, "not-running");
    // No socket and no Cilium runtime state beside it: judged on the maps as before.
    let (code, doc, _) = check(&node, None, &[]);
    assert_eq!(
        (code, kinds(&doc)),
        (Some(1), vec![pair("ipcache-missing", &remote_pod())]),
        "{doc:#}"
    );
    assert_eq!(
        (
            doc["sources"]["cilium"]["state"].as_str(),
            doc["sources"]["cilium"]["source"].as_str()
        ),
        (Some("unknown"), Some("none")),
        "{doc:#}"
    );
}

/// A restart as Cilium 1.16 does it: the new agent re-creates and re-pins the ipcache (filled
/// from the kvstore) while the program attached to cilium_host keeps the old map until its
/// endpoint is regenerated. `check` started during it waits and then reports clean; a program
/// left on the old map once the agent is ready is `datapath-map-mismatch` (#45196).
#[test]
fn a_restart_is_waited_out_and_an_orphaned_map_is_still_found() {
    if !require_root("a_restart_is_waited_out_and_an_orphaned_map_is_still_found") {
        return;
    }
    let mut node = consistent_node(NodeSpec::new(Layout::V1_15, false)).unwrap();
    let old_prog = progs::classifier_using("cil_from_host", node.maps.ipcache.fd.as_fd()).unwrap();
    let old_link = progs::attach_tcx(
        &node.netns.name,
        "cilium_host",
        old_prog.as_fd(),
        BPF_TCX_INGRESS,
    )
    .unwrap();
    let mut api = CiliumApi::start(agent_docs("ready", true));
    let (code, doc, _) = check(&node, Some(&api), &[]);
    assert_eq!((code, kinds(&doc)), (Some(0), vec![]), "{doc:#}");

    // The restart: a new instance (silent while it initializes), the ipcache re-created.
    api.restart(Mode::Silent);
    node.maps.ipcache.recreate().unwrap();
    let args = check_args(&node, Some(&api), &["--cilium-ready-timeout", "30s"]);
    let child = Command::new(kvcheck_tests::kvcheck_bin())
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // Its API answers; the endpoints it restored are regenerating.
    api.set(agent_docs("regenerating", true));
    std::thread::sleep(Duration::from_millis(4000));
    // Regenerated: the program now uses the new map.
    let new_prog = progs::classifier_using("cil_from_host", node.maps.ipcache.fd.as_fd()).unwrap();
    let new_link = progs::attach_tcx(
        &node.netns.name,
        "cilium_host",
        new_prog.as_fd(),
        BPF_TCX_INGRESS,
    )
    .unwrap();
    drop(old_link);
    api.set(agent_docs("ready", true));
    let out = child.wait_with_output().unwrap();
    let doc: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(
        (out.status.code(), kinds(&doc)),
        (Some(0), vec![]),
        "{doc:#}"
    );
    let c = &doc["sources"]["cilium"];
    assert_eq!(c["state"], "ready", "{c:#}");
    assert!(
        c["waited_ms"].as_u64().unwrap() >= 5000,
        "waited through the restart: {c:#}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("starting") && stderr.contains("restoring"),
        "said what it waited for: {stderr}"
    );

    // The next restart leaves the program on the old map although the agent says it is done.
    api.restart(agent_docs("ready", true));
    node.maps.ipcache.recreate().unwrap();
    let (code, doc, _) = check(&node, Some(&api), &[]);
    assert_eq!(
        (code, kinds(&doc)),
        (
            Some(1),
            vec![pair("datapath-map-mismatch", "cilium_ipcache")]
        ),
        "{doc:#}"
    );
    let f = &doc["findings"][0];
    assert!(
        f["message"].as_str().unwrap().contains("left on that map"),
        "{f:#}"
    );
    assert!(f["datapath"]["pinned_at"].is_string(), "{f:#}");
    // Without the API the same mismatch is reported, with the pin's age as a hint.
    let (code, doc, _) = check(&node, None, &[]);
    assert_eq!(
        (code, kinds(&doc)),
        (
            Some(1),
            vec![pair("datapath-map-mismatch", "cilium_ipcache")]
        ),
        "{doc:#}"
    );
    assert!(
        doc["findings"][0]["message"]
            .as_str()
            .unwrap()
            .contains("s old"),
        "{doc:#}"
    );
    drop(new_link);
}

/// The value of metric `name` on the line that also carries `label` (e.g. `state="ready"`).
fn metric(agent: &Agent, name: &str, label: &str) -> Option<f64> {
    let (_, body) = http_get(agent.port, "/metrics")?;
    body.lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The agent holds findings while Cilium is down or restoring (node-health line, metric,
/// /readyz body say so) and judges again once it is ready, the grace period counted from then.
#[test]
fn the_agent_holds_findings_while_cilium_recovers() {
    if !require_root("the_agent_holds_findings_while_cilium_recovers") {
        return;
    }
    let node = consistent_node(NodeSpec::new(Layout::V1_15, false)).unwrap();
    let mut api = CiliumApi::start(agent_docs("ready", true));
    let agent = Agent::start(&node, &["--cilium-socket", api.socket_str()]);
    let (st, _) = agent.wait_for("cilium-agent-state", None, None, Duration::from_secs(10));
    assert_eq!(st["state"], "ready", "{st}");

    api.crash();
    let (st, _) = agent.wait_for("cilium-agent-state", None, None, Duration::from_secs(15));
    assert_eq!(st["state"], "not-running", "{st}");
    let health = agent.wait_health("ok", "connected", Duration::from_secs(5));
    assert!(
        health["cilium"]
            .as_str()
            .unwrap()
            .starts_with("not-running"),
        "{health}"
    );
    assert_eq!(health["judging"], false, "{health}");
    node.ipcache_delete(&remote_pod()).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(agent.opened(), vec![], "nothing opens while Cilium is down");
    let (code, body) = http_get(agent.port, "/readyz").unwrap();
    assert!(
        code == 200 && body.contains("not-running") && body.contains("held"),
        "{code} {body}"
    );
    assert_eq!(metric(&agent, "kvcheck_judging", ""), Some(0.0));
    assert_eq!(
        metric(
            &agent,
            "kvcheck_cilium_agent_state",
            "state=\"not-running\""
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&agent, "kvcheck_cilium_agent_state", "state=\"ready\""),
        Some(0.0)
    );

    api.restart(agent_docs("regenerating", true));
    let (st, _) = agent.wait_for("cilium-agent-state", None, None, Duration::from_secs(5));
    assert_eq!(st["state"], "restoring", "{st}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        agent.opened(),
        vec![],
        "nothing opens while Cilium restores endpoints"
    );

    api.set(agent_docs("ready", true));
    let (st, ready_at) = agent.wait_for("cilium-agent-state", None, None, Duration::from_secs(5));
    assert_eq!(st["state"], "ready", "{st}");
    let (_, opened_at) = agent.wait_for(
        "finding-opened",
        Some("ipcache-missing"),
        Some(&remote_pod()),
        Duration::from_secs(5),
    );
    let after = opened_at - ready_at;
    assert!(
        after >= Duration::from_millis(900) && after <= Duration::from_millis(2500),
        "opened {after:?} after Cilium was ready (grace 1 s)"
    );
    assert_eq!(metric(&agent, "kvcheck_judging", ""), Some(1.0));
}
