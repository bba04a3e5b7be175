//! The Cilium agent's state as kvcheck judges it (pure): from what its API answered (or how
//! its socket failed), whether the datapath may be judged now. While the agent is down,
//! starting, reports itself or its kvstore not ready, or has not finished regenerating the
//! endpoints it restored, differences between the datapath and the cluster state are Cilium
//! recovering, not drift (docs/cilium-expected-state.md, "Cilium agent restarts").

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::Serialize;

use super::client::ApiError;
use super::models::{DaemonConfiguration, Endpoint, RemoteCluster, Status, StatusResponse};

/// What kvcheck makes of the Cilium agent on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Readiness {
    /// Healthy, and every endpoint it restored is regenerated.
    Ready,
    /// No API to ask (no socket and no sign of Cilium's runtime state, or access refused):
    /// judged on the maps and pins alone, as without this source.
    Unknown,
    /// Not running: its socket is gone or nobody listens on it.
    NotRunning,
    /// Running, but its API does not answer yet (it answers once the daemon is initialized).
    Starting,
    /// It answers and says it, or its kvstore, is not healthy.
    NotReady,
    /// Healthy, still regenerating the endpoints it restored at start: their programs switch
    /// to the maps it re-created only then.
    Restoring,
}

impl Readiness {
    pub const ALL: [Readiness; 6] = [
        Readiness::Ready,
        Readiness::Unknown,
        Readiness::NotRunning,
        Readiness::Starting,
        Readiness::NotReady,
        Readiness::Restoring,
    ];

    /// Whether differences found now are drift.
    pub fn judge(self) -> bool {
        matches!(self, Readiness::Ready | Readiness::Unknown)
    }

    pub fn name(self) -> &'static str {
        match self {
            Readiness::Ready => "ready",
            Readiness::Unknown => "unknown",
            Readiness::NotRunning => "not-running",
            Readiness::Starting => "starting",
            Readiness::NotReady => "not-ready",
            Readiness::Restoring => "restoring",
        }
    }
}

/// Endpoint states in which Cilium is still building the endpoint's datapath.
pub const IN_PROGRESS: [&str; 4] = [
    "restoring",
    "waiting-to-regenerate",
    "regenerating",
    "waiting-for-identity",
];

/// The agent's effective configuration, from `GET /v1/config`'s `daemonConfigurationMap`
/// (`option.DaemonConfig` by Go field name).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AgentConfig {
    pub cluster_name: Option<String>,
    pub cluster_id: Option<u32>,
    pub identity_allocation_mode: Option<String>,
    /// `etcd` in kvstore mode, empty in CRD mode.
    pub kvstore: Option<String>,
    /// `tunnel` or `native` (v1.14+; older agents: derived from `Tunnel`).
    pub routing_mode: Option<String>,
    pub tunnel_protocol: Option<String>,
    pub ipv4: Option<bool>,
    pub ipv6: Option<bool>,
    pub enable_cilium_endpoint_slice: Option<bool>,
    pub max_connected_clusters: Option<u32>,
}

impl AgentConfig {
    pub fn from_api(c: &DaemonConfiguration) -> AgentConfig {
        let Some(status) = &c.status else {
            return AgentConfig::default();
        };
        let m = &status.daemon_configuration_map;
        let text = |k: &str| m.get(k).and_then(|v| v.as_str()).map(str::to_owned);
        let flag = |k: &str| m.get(k).and_then(serde_json::Value::as_bool);
        let number = |k: &str| {
            m.get(k)
                .and_then(serde_json::Value::as_u64)
                .and_then(|n| u32::try_from(n).ok())
        };
        // v1.7-v1.13 had `Tunnel` ("vxlan", "geneve", "disabled") instead of RoutingMode.
        let legacy_tunnel = text("Tunnel");
        let routing_mode = text("RoutingMode").or_else(|| {
            legacy_tunnel.as_deref().map(|t| {
                if t == "disabled" {
                    "native".into()
                } else {
                    "tunnel".into()
                }
            })
        });
        let family = |name: &str, k: &str| {
            let from_addressing = status
                .addressing
                .as_ref()
                .and_then(|a| {
                    if name == "ipv4" {
                        a.ipv4.as_ref()
                    } else {
                        a.ipv6.as_ref()
                    }
                })
                .map(|e| e.enabled);
            flag(k).or(from_addressing)
        };
        AgentConfig {
            cluster_name: text("ClusterName"),
            cluster_id: number("ClusterID"),
            identity_allocation_mode: text("IdentityAllocationMode"),
            kvstore: text("KVStore").or_else(|| {
                status
                    .kvstore_configuration
                    .as_ref()
                    .map(|k| k.kind.clone())
            }),
            routing_mode,
            tunnel_protocol: text("TunnelProtocol").or(legacy_tunnel.filter(|t| t != "disabled")),
            ipv4: family("ipv4", "EnableIPv4"),
            ipv6: family("ipv6", "EnableIPv6"),
            enable_cilium_endpoint_slice: flag("EnableCiliumEndpointSlice"),
            max_connected_clusters: number("MaxConnectedClusters"),
        }
    }
}

/// Local endpoints by state, and the ones kvcheck waits for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EndpointSummary {
    pub total: usize,
    pub by_state: BTreeMap<String, usize>,
    /// Endpoints the agent restored (in progress when this agent instance was first seen)
    /// that have not yet been regenerated: `12 default/pod-a: regenerating`.
    pub restoring: Vec<String>,
}

/// One Cilium map pin: which map object it is and when it was pinned (its inode's mtime; a
/// restart that re-creates the map pins a new one).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PinInfo {
    pub map: String,
    pub id: u32,
    pub pinned_at: Option<String>,
}

/// The Cilium agent's state, as `check`'s report and the agent's logs show it.
#[derive(Clone, Debug, Serialize)]
pub struct CiliumAgentState {
    /// `api` (its REST API answered), `socket` (only how its socket failed),
    /// `runtime-dir` (no socket; its runtime directory shows it ran here), or `none`.
    pub source: &'static str,
    pub socket: PathBuf,
    pub state: Readiness,
    pub reason: String,
    /// From the healthz answer's `cilium.msg`.
    pub version: Option<String>,
    /// When this agent instance created its API socket.
    pub started_at: Option<String>,
    pub kvstore: Option<Status>,
    pub cluster_mesh: Vec<RemoteCluster>,
    pub endpoints: Option<EndpointSummary>,
    pub config: Option<AgentConfig>,
    pub pins: Vec<PinInfo>,
    /// How long `check` waited for the agent to become ready.
    pub waited_ms: u128,
}

impl CiliumAgentState {
    /// One line for the node-health log, the report and errors: `ready (api, 1.16.15)`.
    pub fn summary(&self) -> String {
        let mut s = format!("{} ({}", self.state.name(), self.source);
        if let Some(v) = &self.version {
            s.push_str(", ");
            s.push_str(v);
        }
        s.push(')');
        if !self.reason.is_empty() && self.state != Readiness::Ready {
            s.push_str(": ");
            s.push_str(&self.reason);
        }
        s
    }
}

/// What one look at the agent found (the I/O's output; `assess` judges it).
#[derive(Debug)]
pub struct Observation {
    pub socket: PathBuf,
    pub healthz: Result<StatusResponse, ApiError>,
    /// Asked only when healthz answered.
    pub endpoints: Option<Result<Vec<Endpoint>, ApiError>>,
    pub config: Option<AgentConfig>,
    /// The socket's mtime: tells one agent instance from the next.
    pub started_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Cilium's runtime directory (the socket's) holds its state: it has run on this node.
    pub runtime_dir: Option<PathBuf>,
    pub pins: Vec<PinInfo>,
}

/// Which endpoints of the current agent instance are still being restored. The endpoints in
/// progress when an instance is first seen answering are the ones it restored (they are in
/// its endpoint manager before its API answers: `regenerateRestoredEndpoints`); each is waited
/// for until it has settled once or is gone. Endpoints that start regenerating later are
/// ordinary churn, which the settle and grace periods cover.
///
/// From v1.8 every agent has a host endpoint (`reserved:host`, identity 1; created at start when
/// it was not restored), whose regeneration (v1.16+) switches the programs on cilium_host and the
/// native devices to the re-created maps. v1.18+ answers healthz before the restored endpoints are
/// listed, so the restore is taken to begin at the first answer that lists the host endpoint.
#[derive(Clone, Debug, Default)]
pub struct RestoreGate {
    instance: Option<Option<chrono::DateTime<chrono::Utc>>>,
    waiting: Option<BTreeSet<i64>>,
}

/// Whether `version` (`1.16.15`) is at least `major.minor`.
fn at_least(version: Option<&str>, major: u32, minor: u32) -> bool {
    let Some(v) = version else { return false };
    let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
    matches!((it.next().flatten(), it.next().flatten()), (Some(a), Some(b)) if (a, b) >= (major, minor))
}

/// The host endpoint: label `reserved:host`, identity 1.
fn is_host_endpoint(e: &Endpoint) -> bool {
    let status = e.status.as_ref();
    status
        .and_then(|s| s.labels.as_ref())
        .is_some_and(|l| l.security_relevant.iter().any(|l| l == "reserved:host"))
        || status
            .and_then(|s| s.identity.as_ref())
            .is_some_and(|i| i.id == 1)
}

impl RestoreGate {
    /// The agent did not answer: its next answer starts a new restore.
    pub fn reset(&mut self) {
        *self = RestoreGate::default();
    }

    /// The endpoints still awaited, after this look at them; `None` while the restore has not
    /// visibly begun (a v1.16+ agent that lists no host endpoint yet).
    fn update(
        &mut self,
        instance: Option<chrono::DateTime<chrono::Utc>>,
        endpoints: &[Endpoint],
        has_host_endpoint: bool,
    ) -> Option<BTreeSet<i64>> {
        if self.instance != Some(instance) {
            self.instance = Some(instance);
            self.waiting = None;
        }
        if self.waiting.is_none() && has_host_endpoint && !endpoints.iter().any(is_host_endpoint) {
            return None;
        }
        let in_progress: BTreeSet<i64> = endpoints
            .iter()
            .filter(|e| IN_PROGRESS.contains(&state_of(e)))
            .map(|e| e.id)
            .collect();
        let waiting = self.waiting.get_or_insert_with(|| in_progress.clone());
        waiting.retain(|id| in_progress.contains(id));
        Some(waiting.clone())
    }
}

fn state_of(e: &Endpoint) -> &str {
    e.status.as_ref().map_or("", |s| s.state.as_str())
}

fn endpoint_name(e: &Endpoint) -> String {
    let status = e.status.as_ref();
    let ids = status.and_then(|s| s.external_identifiers.as_ref());
    // The host and health endpoints have pod-name "/".
    let pod = ids.and_then(|i| {
        i.pod_name.clone().filter(|p| p.len() > 1).or_else(|| {
            Some(format!(
                "{}/{}",
                i.k8s_namespace.as_deref()?,
                i.k8s_pod_name.as_deref()?
            ))
        })
    });
    let reserved = || {
        status.and_then(|s| s.labels.as_ref()).and_then(|l| {
            l.security_relevant
                .iter()
                .find(|l| l.starts_with("reserved:"))
                .cloned()
        })
    };
    pod.or_else(reserved).unwrap_or_else(|| "-".to_owned())
}

/// `1.16.15` from `1.16.15 (v1.16.15-7513067)` and the like.
fn version_of(msg: &str) -> Option<String> {
    let first = msg.split_whitespace().next()?;
    first
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_digit())
        .then(|| first.to_owned())
}

/// Judges one observation; `gate` carries the restore across observations.
pub fn assess(obs: Observation, gate: &mut RestoreGate) -> CiliumAgentState {
    let mut st = CiliumAgentState {
        source: "api",
        socket: obs.socket.clone(),
        state: Readiness::Ready,
        reason: String::new(),
        version: None,
        started_at: obs.started_at.map(|t| t.to_rfc3339()),
        kvstore: None,
        cluster_mesh: Vec::new(),
        endpoints: None,
        config: obs.config.clone(),
        pins: obs.pins.clone(),
        waited_ms: 0,
    };
    let sock = obs.socket.display().to_string();
    let sr = match obs.healthz {
        Ok(sr) => sr,
        Err(e) => {
            gate.reset();
            st.source = "socket";
            (st.state, st.reason) = match e {
                ApiError::Absent(_) => match &obs.runtime_dir {
                    Some(dir) => {
                        st.source = "runtime-dir";
                        (
                            Readiness::NotRunning,
                            format!(
                                "its API socket {sock} is absent, while {} holds its state: the agent is not running (or not serving its API yet)",
                                dir.display()
                            ),
                        )
                    }
                    None => {
                        st.source = "none";
                        (
                            Readiness::Unknown,
                            format!(
                                "no Cilium API socket at {sock} and no Cilium runtime state beside it: judged on the maps and pins alone"
                            ),
                        )
                    }
                },
                ApiError::Refused(_) => (
                    Readiness::NotRunning,
                    format!(
                        "nothing listens on {sock} (connection refused): the agent is not running"
                    ),
                ),
                ApiError::Timeout { .. } => (
                    Readiness::Starting,
                    format!(
                        "its API on {sock} accepts connections but does not answer yet: the agent is initializing ({e})"
                    ),
                ),
                ApiError::Status { status, .. } if status >= 500 => (
                    Readiness::Starting,
                    format!("its API is not serving yet: {e}"),
                ),
                e @ (ApiError::Denied { .. }
                | ApiError::Status { .. }
                | ApiError::Decode { .. }
                | ApiError::Io { .. }) => (
                    Readiness::Unknown,
                    format!(
                        "the Cilium API could not be read ({e}): judged on the maps and pins alone"
                    ),
                ),
            };
            return st;
        }
    };
    st.version = sr.cilium.as_ref().and_then(|c| version_of(&c.msg));
    let has_host_firewall = sr.host_firewall.is_some();
    st.kvstore = sr.kvstore.clone();
    st.cluster_mesh = sr.cluster_mesh.map(|c| c.clusters).unwrap_or_default();
    let cilium = sr.cilium.unwrap_or_default();
    if !cilium.is_ok() {
        gate.reset();
        st.state = Readiness::NotReady;
        st.reason = format!(
            "Cilium reports {}: {}",
            if cilium.state.is_empty() {
                "no state"
            } else {
                &cilium.state
            },
            cilium.msg.trim()
        );
        return st;
    }
    // v1.16 reports a kvstore it is still connecting to as Ok (pkg/kvstore/etcd.go `Status`).
    if let Some(kv) = sr
        .kvstore
        .as_ref()
        .filter(|k| !k.is_ok_or_disabled() || k.msg.contains("Waiting for initial connection"))
    {
        gate.reset();
        st.state = Readiness::NotReady;
        st.reason = format!(
            "its kvstore is {}: {}",
            if kv.is_ok() {
                "not connected yet"
            } else {
                &kv.state
            },
            kv.msg.trim()
        );
        return st;
    }
    match obs.endpoints {
        Some(Ok(eps)) => {
            // A build without a version string: its healthz fields tell a v1.9+ agent.
            let has_host_endpoint = at_least(st.version.as_deref(), 1, 8)
                || (st.version.is_none() && has_host_firewall);
            let Some(waiting) = gate.update(obs.started_at, &eps, has_host_endpoint) else {
                st.state = Readiness::Restoring;
                st.reason = format!(
                    "its host endpoint is not listed yet ({} endpoints listed): the programs on cilium_host and the native devices switch to the maps it re-created when that endpoint is regenerated",
                    eps.len()
                );
                st.endpoints = Some(EndpointSummary {
                    total: eps.len(),
                    ..Default::default()
                });
                return st;
            };
            let mut summary = EndpointSummary {
                total: eps.len(),
                ..Default::default()
            };
            for e in &eps {
                *summary.by_state.entry(state_of(e).to_owned()).or_default() += 1;
            }
            summary.restoring = eps
                .iter()
                .filter(|e| waiting.contains(&e.id))
                .map(|e| format!("{} {}: {}", e.id, endpoint_name(e), state_of(e)))
                .collect();
            if !summary.restoring.is_empty() {
                st.state = Readiness::Restoring;
                st.reason = format!(
                    "{} of {} endpoints it restored not yet regenerated ({}); their programs switch to the maps it re-created only then",
                    summary.restoring.len(),
                    eps.len(),
                    summary
                        .restoring
                        .iter()
                        .take(5)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            st.endpoints = Some(summary);
        }
        Some(Err(e)) => {
            st.reason =
                format!("endpoint states unreadable ({e}); judged without waiting for regeneration")
        }
        None => {}
    }
    st
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cilium::models::EndpointStatus;

    fn healthy() -> StatusResponse {
        serde_json::from_str(r#"{"cilium":{"state":"Ok","msg":"1.16.15 (v1.16.15-7513067)"},"kvstore":{"state":"Ok","msg":"etcd: 1/1 connected"}}"#).unwrap()
    }

    fn ep(id: i64, state: &str) -> Endpoint {
        Endpoint {
            id,
            status: Some(EndpointStatus {
                state: state.into(),
                ..Default::default()
            }),
        }
    }

    fn host(id: i64, state: &str) -> Endpoint {
        let mut e = ep(id, state);
        if let Some(s) = e.status.as_mut() {
            s.labels = Some(crate::cilium::models::LabelConfigurationStatus {
                security_relevant: vec!["reserved:host".into()],
            });
        }
        e
    }

    fn obs(
        healthz: Result<StatusResponse, ApiError>,
        eps: Option<Vec<Endpoint>>,
        started: i64,
    ) -> Observation {
        Observation {
            socket: "/var/run/cilium/cilium.sock".into(),
            healthz,
            endpoints: eps.map(Ok),
            config: None,
            started_at: chrono::DateTime::from_timestamp(started, 0),
            runtime_dir: None,
            pins: vec![],
        }
    }

    #[test]
    fn socket_failures_name_the_agent_state() {
        let mut g = RestoreGate::default();
        let absent = assess(obs(Err(ApiError::Absent("/s".into())), None, 0), &mut g);
        assert_eq!((absent.state, absent.source), (Readiness::Unknown, "none"));
        let mut o = obs(Err(ApiError::Absent("/s".into())), None, 0);
        o.runtime_dir = Some("/var/run/cilium".into());
        assert_eq!(assess(o, &mut g).state, Readiness::NotRunning);
        assert_eq!(
            assess(obs(Err(ApiError::Refused("/s".into())), None, 0), &mut g).state,
            Readiness::NotRunning
        );
        let t = ApiError::Timeout {
            what: "GET /v1/healthz".into(),
            timeout: std::time::Duration::from_secs(2),
        };
        assert_eq!(
            assess(obs(Err(t), None, 0), &mut g).state,
            Readiness::Starting
        );
        let d = ApiError::Decode {
            path: "/v1/healthz".into(),
            message: "x".into(),
        };
        assert_eq!(
            assess(obs(Err(d), None, 0), &mut g).state,
            Readiness::Unknown
        );
    }

    #[test]
    fn unhealthy_agent_or_kvstore_is_not_ready() {
        let mut g = RestoreGate::default();
        let mut sr = healthy();
        sr.kvstore = Some(Status {
            state: "Failure".into(),
            msg: "Err: quorum check failed".into(),
        });
        let s = assess(obs(Ok(sr), Some(vec![]), 0), &mut g);
        assert_eq!(s.state, Readiness::NotReady);
        assert!(s.reason.contains("quorum check failed"), "{}", s.reason);
        let ok = assess(obs(Ok(healthy()), Some(vec![host(1, "ready")]), 0), &mut g);
        assert_eq!(
            (ok.state, ok.version.as_deref()),
            (Readiness::Ready, Some("1.16.15"))
        );
    }

    #[test]
    fn restored_endpoints_are_waited_for_and_later_churn_is_not() {
        let mut g = RestoreGate::default();
        // First answer of this instance: endpoints 1 and 2 are being restored.
        let s = assess(
            obs(
                Ok(healthy()),
                Some(vec![
                    ep(1, "restoring"),
                    ep(2, "regenerating"),
                    host(3, "ready"),
                ]),
                100,
            ),
            &mut g,
        );
        assert_eq!(s.state, Readiness::Restoring);
        assert_eq!(s.endpoints.as_ref().unwrap().restoring.len(), 2);
        // 1 done, 2 still at it, and a new pod (4) appears: only 2 is awaited.
        let s = assess(
            obs(
                Ok(healthy()),
                Some(vec![
                    ep(1, "ready"),
                    ep(2, "waiting-to-regenerate"),
                    host(3, "ready"),
                    ep(4, "waiting-for-identity"),
                ]),
                100,
            ),
            &mut g,
        );
        assert_eq!(
            s.endpoints.as_ref().unwrap().restoring,
            vec!["2 -: waiting-to-regenerate"]
        );
        // 2 done: ready, although 4 is still regenerating.
        let s = assess(
            obs(
                Ok(healthy()),
                Some(vec![
                    ep(1, "ready"),
                    ep(2, "ready"),
                    host(3, "ready"),
                    ep(4, "regenerating"),
                ]),
                100,
            ),
            &mut g,
        );
        assert_eq!(s.state, Readiness::Ready);
        // A new instance (restart): what is in progress then is awaited again; first the host
        // endpoint must be listed (v1.18+ answers before it lists restored endpoints).
        let s = assess(obs(Ok(healthy()), Some(vec![]), 200), &mut g);
        assert_eq!(s.state, Readiness::Restoring);
        assert!(s.reason.contains("host endpoint"), "{}", s.reason);
        let s = assess(
            obs(
                Ok(healthy()),
                Some(vec![ep(1, "restoring"), host(2, "restoring")]),
                200,
            ),
            &mut g,
        );
        assert_eq!(
            (s.state, s.endpoints.as_ref().unwrap().restoring.len()),
            (Readiness::Restoring, 2)
        );
        let s = assess(
            obs(
                Ok(healthy()),
                Some(vec![ep(1, "ready"), host(2, "ready")]),
                200,
            ),
            &mut g,
        );
        assert_eq!(s.state, Readiness::Ready);
        assert!(!Readiness::Restoring.judge() && Readiness::Unknown.judge());
    }

    #[test]
    fn a_kvstore_still_connecting_is_not_ready() {
        let mut sr = healthy();
        sr.kvstore = Some(Status {
            state: "Ok".into(),
            msg: "etcd: Waiting for initial connection to be established".into(),
        });
        let s = assess(obs(Ok(sr), Some(vec![]), 0), &mut RestoreGate::default());
        assert_eq!(s.state, Readiness::NotReady);
        assert!(
            at_least(Some("1.16.15"), 1, 16)
                && !at_least(Some("1.7.1"), 1, 8)
                && at_least(Some("1.18.0"), 1, 16)
        );
    }

    /// Every document of tests/data/cilium-api decodes and is judged as its shape says.
    #[test]
    fn captured_and_model_shaped_documents() {
        macro_rules! doc {
            ($v:literal, $n:literal) => {
                include_str!(concat!(
                    "../../../tests/data/cilium-api/",
                    $v,
                    "/",
                    $n,
                    ".json"
                ))
            };
        }
        let judge = |healthz: &str, endpoints: &str| {
            let o = Observation {
                healthz: Ok(serde_json::from_str(healthz).unwrap()),
                endpoints: Some(Ok(serde_json::from_str(endpoints).unwrap())),
                ..obs(Err(ApiError::Absent("/s".into())), None, 5)
            };
            assess(o, &mut RestoreGate::default())
        };
        let real = judge(doc!("v1.16.15", "healthz"), doc!("v1.16.15", "endpoint"));
        assert_eq!(
            (real.state, real.endpoints.as_ref().map(|e| e.total)),
            (Readiness::Ready, Some(2)),
            "{real:?}"
        );
        assert_eq!(
            judge(
                doc!("v1.16.15", "healthz-kvstore-down"),
                doc!("v1.16.15", "endpoint")
            )
            .state,
            Readiness::NotReady
        );
        let old = judge(doc!("v1.7.1", "healthz"), doc!("v1.7.1", "endpoint"));
        assert_eq!(old.state, Readiness::Ready, "{old:?}");
        assert_eq!(
            judge(
                doc!("v1.7.1", "healthz"),
                doc!("v1.7.1", "endpoint-regenerating")
            )
            .state,
            Readiness::Restoring
        );
        assert_eq!(
            judge(
                doc!("v1.7.1", "healthz-kvstore-down"),
                doc!("v1.7.1", "endpoint")
            )
            .state,
            Readiness::NotReady
        );
        let cfg = AgentConfig::from_api(&serde_json::from_str(doc!("v1.16.15", "config")).unwrap());
        assert_eq!(
            (
                cfg.cluster_name.as_deref(),
                cfg.kvstore.as_deref(),
                cfg.identity_allocation_mode.as_deref(),
                cfg.routing_mode.as_deref()
            ),
            (
                Some("default"),
                Some("etcd"),
                Some("kvstore"),
                Some("tunnel")
            )
        );
        let old_cfg =
            AgentConfig::from_api(&serde_json::from_str(doc!("v1.7.1", "config")).unwrap());
        assert_eq!(
            (old_cfg.kvstore.as_deref(), old_cfg.ipv4),
            (Some("etcd"), Some(true))
        );
    }

    #[test]
    fn nulls_read_as_empty() {
        let e: Vec<Endpoint> = serde_json::from_str(r#"[{"id":7,"status":{"state":"ready","networking":{"addressing":null},"labels":{"security-relevant":null},"identity":{"id":1}}}]"#).unwrap();
        assert!(is_host_endpoint(&e[0]));
        let sr: StatusResponse = serde_json::from_str(r#"{"cilium":{"state":"Ok","msg":"x"},"cluster-mesh":{"clusters":null},"stale":null,"cluster":{"self":"n","nodes":null}}"#).unwrap();
        assert!(sr.cluster_mesh.unwrap().clusters.is_empty());
    }

    #[test]
    fn config_from_the_daemon_configuration_map() {
        let c: DaemonConfiguration = serde_json::from_str(r#"{"status":{"daemonConfigurationMap":{"ClusterName":"cluster1","ClusterID":1,"IdentityAllocationMode":"kvstore","KVStore":"etcd","RoutingMode":"tunnel","TunnelProtocol":"vxlan","EnableIPv4":true,"EnableIPv6":false,"MaxConnectedClusters":255},"unknown":1}}"#).unwrap();
        let a = AgentConfig::from_api(&c);
        assert_eq!(
            (
                a.cluster_name.as_deref(),
                a.cluster_id,
                a.ipv6,
                a.max_connected_clusters
            ),
            (Some("cluster1"), Some(1), Some(false), Some(255))
        );
        let old: DaemonConfiguration =
            serde_json::from_str(r#"{"status":{"daemonConfigurationMap":{"Tunnel":"disabled"}}}"#)
                .unwrap();
        assert_eq!(
            AgentConfig::from_api(&old).routing_mode.as_deref(),
            Some("native")
        );
    }
}
