//! Prometheus metrics (`kvcheck_` prefix) and the HTTP endpoints `/metrics`, `/healthz`, `/readyz`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
    /// `critical`, `warning` or `info`: the kind's severity (alerts route by it).
    pub severity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabel {
    pub map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateSourceLabel {
    /// `endpoints` (nodes and pod IPs) or `identities`.
    pub kind: String,
    /// `kvstore` or `kubernetes`.
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabel {
    pub resource: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RemoteLabel {
    pub cluster: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabel {
    pub cluster: String,
}

pub struct Metrics {
    pub registry: Mutex<Registry>,
    pub findings: Family<KindLabel, Gauge>,
    pub check_duration: Histogram,
    pub etcd_connected: Gauge,
    pub etcd_endpoints: Gauge,
    pub map_fill_ratio: Family<MapLabel, Gauge<f64, AtomicU64>>,
    pub change_events: Family<SourceLabel, Counter>,
    /// Kvstore watch streams the current watch gave up as stalled (no event, no progress
    /// answer); a gauge, as `promtool check metrics` wants a counter's help under its `_total`
    /// name.
    pub watch_stalls: Gauge,
    pub last_check: Gauge<f64, AtomicU64>,
    pub maps_in_use: Family<MapLabel, Gauge>,
    /// 1 when /readyz answers 200 (initial check done, etcd reachable).
    pub ready_gauge: Gauge,
    pub ready: AtomicBool,
    pub failed: AtomicBool,
    /// 1 for the Cilium agent's current state (`ready`, `restoring`, `not-running`, ...).
    pub cilium_agent_state: Family<StateLabel, Gauge>,
    /// 1 while findings are judged; 0 while held because the Cilium agent is recovering.
    pub judging: Gauge,
    /// 1 for where each kind of cluster state is read from.
    pub state_source: Family<StateSourceLabel, Gauge>,
    /// Cilium objects held from the Kubernetes watch, per resource.
    pub kubernetes_objects: Family<ResourceLabel, Gauge>,
    /// ClusterMesh: 1 for each remote cluster's current state.
    pub remote_clusters: Family<RemoteLabel, Gauge>,
    /// ClusterMesh: open findings about each remote cluster.
    pub remote_cluster_findings: Family<ClusterLabel, Gauge>,
    /// The clusters that have had findings (their series stay, at 0 once resolved).
    pub finding_clusters: Mutex<std::collections::BTreeSet<String>>,
    /// The Cilium agent line of /readyz's body.
    pub cilium_note: Mutex<String>,
    /// When the agent loop last made progress (Unix ms) and how long without it means stuck
    /// (0: not watched yet): /healthz fails then, so the kubelet restarts a stuck agent.
    loop_beat_ms: AtomicU64,
    stall_after_ms: AtomicU64,
}

impl Metrics {
    /// Every metric carries `node="<node>"`: alerts name the node without relabelling.
    pub fn new(node: &str) -> Arc<Metrics> {
        let labels = std::iter::once((std::borrow::Cow::Borrowed("node"), std::borrow::Cow::Owned(node.to_owned())));
        let mut registry = Registry::with_prefix_and_labels("kvcheck", labels);
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            findings: Family::default(),
            check_duration: Histogram::new(exponential_buckets(0.01, 2.0, 12)),
            etcd_connected: Gauge::default(),
            etcd_endpoints: Gauge::default(),
            map_fill_ratio: Family::default(),
            change_events: Family::default(),
            watch_stalls: Gauge::default(),
            last_check: Gauge::default(),
            maps_in_use: Family::default(),
            ready_gauge: Gauge::default(),
            ready: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            cilium_agent_state: Family::default(),
            judging: Gauge::default(),
            state_source: Family::default(),
            kubernetes_objects: Family::default(),
            remote_clusters: Family::default(),
            remote_cluster_findings: Family::default(),
            finding_clusters: Mutex::default(),
            cilium_note: Mutex::new("cilium: not observed yet".to_owned()),
            loop_beat_ms: AtomicU64::new(0),
            stall_after_ms: AtomicU64::new(0),
        };
        registry.register("findings", "Open findings by kind", m.findings.clone());
        registry.register("check_duration_seconds", "Duration of a full check", m.check_duration.clone());
        registry.register("etcd_endpoints_connected", "etcd endpoints that answered the last probe", m.etcd_connected.clone());
        registry.register("etcd_endpoints", "Configured etcd endpoints", m.etcd_endpoints.clone());
        registry.register("map_fill_ratio", "Entries / max entries per datapath map", m.map_fill_ratio.clone());
        registry.register("change_events", "Datapath and kvstore changes processed", m.change_events.clone());
        registry.register("kvstore_watch_stalls", "Kvstore watch streams the current watch gave up as stalled (quiet, and no answer to a progress request): reconnected and resumed", m.watch_stalls.clone());
        registry.register("last_successful_check_timestamp_seconds", "Unix time of the last successful check", m.last_check.clone());
        registry.register("ready", "1 when the agent is ready (initial check done, etcd reachable), as /readyz", m.ready_gauge.clone());
        registry.register("datapath_maps_in_use", "Distinct maps the attached BPF programs use per Cilium map name (1 when healthy; 0 when none is attached)", m.maps_in_use.clone());
        registry.register("cilium_agent_state", "The Cilium agent's state as kvcheck sees it (1 for the current state)", m.cilium_agent_state.clone());
        registry.register("state_source", "Where each kind of Cilium's cluster state is read (1): endpoints (nodes and pod IPs) and identities, from the kvstore or Kubernetes objects", m.state_source.clone());
        registry.register("kubernetes_objects", "Cilium objects held from the Kubernetes watch, per resource", m.kubernetes_objects.clone());
        registry.register("clustermesh_remote_cluster_status", "ClusterMesh: each remote cluster's state (1 for the current one); only synced remotes are judged", m.remote_clusters.clone());
        registry.register("clustermesh_remote_cluster_findings", "ClusterMesh: open findings about each remote cluster's entries", m.remote_cluster_findings.clone());
        registry.register("judging", "1 while findings are judged; 0 while held because the Cilium agent is down, starting, unhealthy or restoring endpoints", m.judging.clone());
        *m.registry.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = registry;
        Arc::new(m)
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }

    /// The agent loop made progress at `now`; without more for `stall_after` it is stuck.
    pub fn beat(&self, now: std::time::SystemTime, stall_after: std::time::Duration) {
        self.loop_beat_ms.store(unix_ms(now), Ordering::Relaxed);
        self.stall_after_ms.store(u64::try_from(stall_after.as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// How long ago the loop last made progress, when that is longer than allowed.
    pub fn loop_stalled(&self, now: std::time::SystemTime) -> Option<std::time::Duration> {
        let (beat, allowed) = (self.loop_beat_ms.load(Ordering::Relaxed), self.stall_after_ms.load(Ordering::Relaxed));
        let age = unix_ms(now).saturating_sub(beat);
        (allowed > 0 && age > allowed).then(|| std::time::Duration::from_millis(age))
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
        self.publish_ready();
    }

    pub fn set_failed(&self, failed: bool) {
        self.failed.store(failed, Ordering::Relaxed);
        self.publish_ready();
    }

    /// Publishes the Cilium agent's state (metrics and /readyz's body).
    pub fn set_cilium(&self, state: crate::cilium::Readiness, summary: &str, judging: bool) {
        for s in crate::cilium::Readiness::ALL {
            self.cilium_agent_state.get_or_create(&StateLabel { state: s.name().to_owned() }).set(i64::from(s == state));
        }
        self.judging.set(i64::from(judging));
        let held = if judging { "judging: on" } else { "judging: held until the Cilium agent is ready" };
        *self.cilium_note.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = format!("cilium: {summary}\n{held}");
    }

    fn publish_ready(&self) {
        let ready = self.ready.load(Ordering::Relaxed) && !self.failed.load(Ordering::Relaxed);
        self.ready_gauge.set(i64::from(ready));
    }
}

fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A client has this long to send a request's headers (slow senders are cut off).
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// A connection, kept alive or not, is closed after this long.
const CONNECTION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(60);
/// Connections served at once; more are closed on accept (scrapes and probes need a few).
pub const MAX_CONNECTIONS: usize = 32;

/// Serves the endpoints until the returned task is aborted: HTTP/1.1 with a header-read timeout,
/// a lifetime per connection and a cap on concurrent connections (the agent listens on the host
/// network).
/// A TLS server configuration from a PEM certificate chain and key (read once at start).
pub fn tls_config(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<Arc<tokio_rustls::rustls::ServerConfig>> {
    use anyhow::Context as _;
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect())
        .map_err(|e| anyhow::anyhow!("reading the TLS certificate {}: {e}", cert.display()))?;
    anyhow::ensure!(!chain.is_empty(), "the TLS certificate {} holds no certificate", cert.display());
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| anyhow::anyhow!("reading the TLS key {}: {e}", key.display()))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the TLS certificate and key do not go together")?;
    Ok(Arc::new(config))
}

pub async fn serve(listen: std::net::SocketAddr, metrics: Arc<Metrics>, tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let app = router(metrics);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else { continue };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                tracing::debug!(%peer, "HTTP connection refused: {MAX_CONNECTIONS} already open");
                drop(stream);
                continue;
            };
            let service = hyper_util::service::TowerToHyperService::new(app.clone());
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let mut http = hyper::server::conn::http1::Builder::new();
                http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
                match acceptor {
                    None => {
                        let _ = tokio::time::timeout(CONNECTION_LIFETIME, http.serve_connection(hyper_util::rt::TokioIo::new(stream), service)).await;
                    }
                    Some(acceptor) => {
                        // The handshake is bounded like the headers: a slow client holds no slot.
                        if let Ok(Ok(tls)) = tokio::time::timeout(HEADER_READ_TIMEOUT, acceptor.accept(stream)).await {
                            let _ = tokio::time::timeout(CONNECTION_LIFETIME, http.serve_connection(hyper_util::rt::TokioIo::new(tls), service)).await;
                        }
                    }
                }
                drop(permit);
            });
        }
    }))
}

fn router(metrics: Arc<Metrics>) -> axum::Router {
    use axum::http::StatusCode;
    use axum::routing::get;
    let (m1, m2, m3) = (metrics.clone(), metrics.clone(), metrics);
    axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = m1.clone();
                async move { ([("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], m.encode()) }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let m = m3.clone();
                async move {
                    match m.loop_stalled(std::time::SystemTime::now()) {
                        None => (StatusCode::OK, "ok\n".to_owned()),
                        Some(age) => (StatusCode::SERVICE_UNAVAILABLE, format!("stalled: the agent loop last ran {}s ago\n", age.as_secs())),
                    }
                }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let m = m2.clone();
                async move {
                    let note = m.cilium_note.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
                    if m.ready.load(Ordering::Relaxed) && !m.failed.load(Ordering::Relaxed) {
                        (StatusCode::OK, format!("ready\n{note}\n"))
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready\n{note}\n"))
                    }
                }
            }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    /// /healthz: healthy until the loop has gone longer than allowed without progress.
    #[test]
    fn a_stuck_loop_fails_healthz() {
        let m = Metrics::new("n");
        let t0 = SystemTime::now();
        assert_eq!(m.loop_stalled(t0 + Duration::from_secs(3600)), None, "not watched before the loop starts");
        m.beat(t0, Duration::from_secs(300));
        assert_eq!(m.loop_stalled(t0 + Duration::from_secs(299)), None);
        assert_eq!(m.loop_stalled(t0 + Duration::from_secs(301)), Some(Duration::from_secs(301)));
        m.beat(t0 + Duration::from_secs(301), Duration::from_secs(300));
        assert_eq!(m.loop_stalled(t0 + Duration::from_secs(302)), None, "progress again");
    }
}
