//! Cluster-wide alerting (issue 13, part 2): the rules in deploy/prometheus pass
//! `promtool check rules` and their unit tests, the PrometheusRule carries the same groups, the
//! agent's /metrics passes `promtool check metrics`, and a real Prometheus scraping two real
//! agents turns a drift on one node into a firing alert for that node only, resolved after the
//! repair.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kvcheck::model::version::Layout;
use kvcheck_tests::agent::{free_port, http_get, Agent};
use kvcheck_tests::encode::IpcacheValue;
use kvcheck_tests::require_root;
use kvcheck_tests::simcluster::{consistent_node, NodeSpec, NODE_B_IP};
use kvcheck_tests::simnode::SimulatedNode;
use serde_json::Value;

fn rules_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("deploy/prometheus")
}

/// promtool, or (outside CI) a skip message.
fn promtool() -> Option<&'static str> {
    if Command::new("promtool").arg("--version").output().is_ok_and(|o| o.status.success()) {
        return Some("promtool");
    }
    assert!(std::env::var_os("CI").is_none(), "promtool missing: `cargo xtask setup` installs Debian's prometheus package");
    eprintln!("skipping: promtool missing (`cargo xtask setup` installs it)");
    None
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?}: {text}");
    text
}

fn yaml(path: &str) -> serde_json::Value {
    serde_saphyr::from_str(&std::fs::read_to_string(rules_dir().join(path)).unwrap()).unwrap()
}

#[test]
fn rules_pass_promtool_and_every_alert_is_unit_tested() {
    let Some(promtool) = promtool() else { return };
    let text = run_ok(Command::new(promtool).current_dir(rules_dir()).args(["check", "rules", "kvcheck-rules.yaml"]));
    assert!(text.contains("SUCCESS"), "{text}");
    let text = run_ok(Command::new(promtool).current_dir(rules_dir()).args(["test", "rules", "kvcheck-rules-test.yaml"]));
    assert!(text.contains("SUCCESS"), "{text}");

    // The PrometheusRule ships exactly the plain file's groups.
    let plain = yaml("kvcheck-rules.yaml");
    let operator = yaml("kvcheck-prometheusrule.yaml");
    assert_eq!(operator["kind"], "PrometheusRule");
    assert_eq!(operator["spec"]["groups"], plain["groups"], "kvcheck-prometheusrule.yaml differs from kvcheck-rules.yaml");

    // Every alert has a case where it fires and one where it does not, and points at explain.
    let tests = yaml("kvcheck-rules-test.yaml");
    let cases: Vec<&serde_json::Value> = tests["tests"].as_array().unwrap().iter().flat_map(|t| t["alert_rule_test"].as_array().unwrap()).collect();
    for group in plain["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let Some(alert) = rule["alert"].as_str() else { continue };
            let of = |fires: bool| cases.iter().any(|c| c["alertname"].as_str() == Some(alert) && c["exp_alerts"].as_array().is_some_and(|e| e.is_empty() != fires));
            assert!(of(true) && of(false), "{alert}: needs a firing and a quiet unit test");
            assert!(rule["annotations"]["runbook"].as_str().is_some_and(|r| r.starts_with("kvcheck explain")), "{alert}: runbook annotation");
        }
    }
}

#[test]
fn agent_metrics_pass_promtool_check_metrics() {
    if !require_root("agent_metrics_pass_promtool_check_metrics") {
        return;
    }
    let Some(promtool) = promtool() else { return };
    let node = consistent_node(NodeSpec::new(Layout::V1_15, false)).unwrap();
    let agent = Agent::start(&node, &[]);
    let (_, metrics) = http_get(agent.port, "/metrics").unwrap();
    let mut child = Command::new(promtool).args(["check", "metrics"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), metrics.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.trim().is_empty(), "promtool check metrics: {text}\n{metrics}");
}

struct Prometheus {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Prometheus {
    /// A Prometheus server scraping `targets` every second with the shipped rules, their `for:`
    /// windows shortened to `for_` (evaluated every second).
    fn start(targets: &[u16], for_: &str) -> Prometheus {
        let dir = std::env::temp_dir().join(format!("kvcheck-prom-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        let rules = std::fs::read_to_string(rules_dir().join("kvcheck-rules.yaml")).unwrap();
        let rules: String = rules.lines().map(|l| if l.trim_start().starts_with("for: ") { format!("{}for: {for_}", &l[..l.len() - l.trim_start().len()]) } else { l.to_owned() }).collect::<Vec<_>>().join("\n");
        std::fs::write(dir.join("rules.yaml"), rules).unwrap();
        let targets: Vec<String> = targets.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
        std::fs::write(
            dir.join("prometheus.yml"),
            format!("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [rules.yaml]\nscrape_configs:\n  - job_name: kvcheck\n    static_configs:\n      - targets: [{}]\n", targets.join(", ")),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .unwrap();
        let p = Prometheus { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_get(p.port, "/-/ready").is_none_or(|(c, _)| c != 200) {
            assert!(Instant::now() < deadline, "prometheus not ready: {}", std::fs::read_to_string(p.dir.join("prometheus.log")).unwrap_or_default());
            std::thread::sleep(Duration::from_millis(200));
        }
        p
    }

    /// Firing alerts as (alertname, node, kind).
    fn firing(&self) -> Vec<(String, String, String)> {
        let Some((200, body)) = http_get(self.port, "/api/v1/alerts") else { return Vec::new() };
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        v["data"]["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["state"] == "firing")
            .map(|a| {
                let l = &a["labels"];
                (l["alertname"].as_str().unwrap_or_default().to_owned(), l["node"].as_str().unwrap_or_default().to_owned(), l["kind"].as_str().unwrap_or_default().to_owned())
            })
            .collect()
    }

    fn wait_until(&self, what: &str, timeout: Duration, ok: impl Fn(&[(String, String, String)]) -> bool) -> Vec<(String, String, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            let f = self.firing();
            if ok(&f) {
                return f;
            }
            assert!(Instant::now() < deadline, "{what} within {timeout:?}; firing: {f:?}");
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn prometheus_alerts_for_the_drifted_node_only_and_resolves_after_repair() {
    if !require_root("prometheus_alerts_for_the_drifted_node_only_and_resolves_after_repair") {
        return;
    }
    if promtool().is_none() {
        return;
    }
    // Two nodes: node-a (a consistent simulated node) and k8s-node1 (the real 1.16.15 capture).
    let a = consistent_node(NodeSpec::new(Layout::V1_15, false)).unwrap();
    let b = SimulatedNode::real_1_16_15().unwrap();
    let (agent_a, agent_b) = (Agent::start(&a, &[]), Agent::start(&b, &[]));
    let prom = Prometheus::start(&[agent_a.port, agent_b.port], "2s");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(prom.firing(), Vec::new(), "alerts on consistent nodes");

    let stale = IpcacheValue { identity: 1000, tunnel_endpoint: Some(NODE_B_IP.parse().unwrap()), ..Default::default() };
    a.ipcache_put("10.9.9.9/32", stale).unwrap();
    let firing = prom.wait_until("KvcheckCriticalDrift for node-a", Duration::from_secs(30), |f| f.iter().any(|(n, node, kind)| n == "KvcheckCriticalDrift" && node == "node-a" && kind == "ipcache-stale"));
    assert!(firing.iter().all(|(_, node, _)| node == "node-a"), "alerts for other nodes: {firing:?}");

    a.ipcache_delete("10.9.9.9/32").unwrap();
    prom.wait_until("the alert to resolve", Duration::from_secs(30), <[_]>::is_empty);
}
