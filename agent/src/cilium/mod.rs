//! The Cilium agent as a source of its own, beside the datapath and the cluster state: its
//! REST API on the node's unix socket (`client`, read-only GETs), the JSON it serves
//! (`models`), and what kvcheck makes of it (`state`, pure): whether Cilium is down, starting,
//! unhealthy or still restoring endpoints, and its effective configuration. `check` waits for it
//! to be ready before judging; `agent` holds findings while it is not.

pub mod client;
pub mod models;
pub mod state;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use client::ApiClient;
use state::{AgentConfig, Observation, PinInfo, RestoreGate};
pub use state::{CiliumAgentState, Readiness};

/// Where Cilium serves its API (`defaults.SockPath`).
pub const DEFAULT_SOCKET: &str = "/var/run/cilium/cilium.sock";

#[derive(Clone, Debug)]
pub struct CiliumOptions {
    pub socket: PathBuf,
    /// `check` waits this long for the agent to become ready; 0 judges at once.
    pub ready_timeout: Duration,
    /// Bound on each API request.
    pub request_timeout: Duration,
    /// The bpffs root, for the pins' ids and ages.
    pub bpffs: PathBuf,
}

impl Default for CiliumOptions {
    fn default() -> Self {
        CiliumOptions {
            socket: DEFAULT_SOCKET.into(),
            ready_timeout: Duration::from_secs(90),
            request_timeout: Duration::from_secs(2),
            bpffs: crate::datapath::DEFAULT_BPFFS.into(),
        }
    }
}

/// Follows one node's Cilium agent across observations (the restore gate and the agent's
/// configuration are kept per agent instance).
pub struct CiliumAgent {
    opts: CiliumOptions,
    client: ApiClient,
    gate: RestoreGate,
    /// The configuration of the instance that started at this time.
    config: Option<(Option<chrono::DateTime<chrono::Utc>>, AgentConfig)>,
}

impl CiliumAgent {
    pub fn new(opts: &CiliumOptions) -> CiliumAgent {
        CiliumAgent {
            client: ApiClient::new(&opts.socket, opts.request_timeout),
            opts: opts.clone(),
            gate: RestoreGate::default(),
            config: None,
        }
    }

    /// One look at the agent: its API (healthz, then endpoints and, once per instance, its
    /// configuration), its socket's age, its runtime directory and the map pins.
    pub async fn observe(&mut self) -> CiliumAgentState {
        let socket = self.opts.socket.clone();
        let healthz = self
            .client
            .get::<models::StatusResponse>("/v1/healthz")
            .await;
        let started_at = std::fs::symlink_metadata(&socket)
            .and_then(|m| m.modified())
            .ok()
            .map(chrono::DateTime::<chrono::Utc>::from);
        let (mut endpoints, mut config) = (None, None);
        if healthz.is_ok() {
            endpoints = Some(
                self.client
                    .get::<Vec<models::Endpoint>>("/v1/endpoint")
                    .await,
            );
            if self.config.as_ref().is_none_or(|(t, _)| *t != started_at)
                && let Ok(c) = self
                    .client
                    .get::<models::DaemonConfiguration>("/v1/config")
                    .await
            {
                self.config = Some((started_at, AgentConfig::from_api(&c)));
            }
            config = self.config.as_ref().map(|(_, c)| c.clone());
        }
        let obs = Observation {
            socket: socket.clone(),
            healthz,
            endpoints,
            config,
            started_at,
            runtime_dir: runtime_dir(&socket),
            pins: pins(&self.opts.bpffs),
        };
        state::assess(obs, &mut self.gate)
    }

    /// Observes until the agent may be judged or `timeout` has passed (then the last state,
    /// not ready, is returned); `on_wait` hears each state that makes it wait.
    pub async fn wait_ready(
        &mut self,
        timeout: Duration,
        mut on_wait: impl FnMut(&CiliumAgentState),
    ) -> CiliumAgentState {
        let started = Instant::now();
        let mut last_reason = String::new();
        loop {
            let mut st = self.observe().await;
            st.waited_ms = started.elapsed().as_millis();
            if st.state.judge() || started.elapsed() >= timeout {
                return st;
            }
            if st.reason != last_reason {
                on_wait(&st);
                last_reason = st.reason.clone();
            }
            tokio::time::sleep(
                Duration::from_secs(1).min(timeout.saturating_sub(started.elapsed())),
            )
            .await;
        }
    }
}

/// The socket's directory when it holds Cilium's runtime state (`state/globals/node_config.h`,
/// written at every start and left in place when the agent stops): Cilium ran on this node.
fn runtime_dir(socket: &Path) -> Option<PathBuf> {
    let dir = socket.parent()?;
    dir.join("state/globals/node_config.h")
        .exists()
        .then(|| dir.to_owned())
}

/// The Cilium map pins kvcheck reads: map id and pin time.
fn pins(bpffs: &Path) -> Vec<PinInfo> {
    let dir = crate::datapath::globals_dir(bpffs);
    crate::datapath::pinned_ids(bpffs)
        .into_iter()
        .map(|(map, id)| {
            let pinned_at = std::fs::symlink_metadata(dir.join(&map))
                .and_then(|m| m.modified())
                .ok()
                .map(|t| chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339());
            PinInfo { map, id, pinned_at }
        })
        .collect()
}
